"""Jobs: accepted at once, run by whichever replica has room, kept until fetched or expired.

``store`` is the one interface to the job table, over two databases (``sqlite_db``: one file on one host,
the default; ``postgres_db``: a server every replica shares). ``worker`` claims jobs with leases and runs them
through the model service; ``service`` is what the job routes call; ``callbacks`` tells a client a job ended.
"""
