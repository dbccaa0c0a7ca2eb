from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# The tests never reach the Hub: fail fast instead of waiting on a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Jobs of this test run in a store of their own, never in the user's (servers started by tests inherit it).
os.environ.setdefault("JOBS_DB", str(Path(tempfile.mkdtemp(prefix="vlm-test-jobs-")) / "jobs.sqlite3"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The offline tiny Qwen3-VL and its LoRA adapter, built once per test session."""
    from app.demo import build

    return build(tmp_path_factory.mktemp("tiny"))


@pytest.fixture()
def tiny_settings(tiny_model_dir):
    """Settings for the tiny model; extend with ``tiny_settings(**overrides)``."""
    from app.settings import Settings

    def make(**overrides) -> Settings:
        values = {
            "base_model_id": str(tiny_model_dir / "base-model"),
            "adapter_path": tiny_model_dir / "weights",
            "device": "cpu",
            "torch_dtype": "float32",  # exact logits comparisons; the auto choice is tested on its own
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture(scope="module")
def tiny_client(tiny_model_dir):
    """The real app serving the tiny model (float32), loaded once per test module."""
    from fastapi.testclient import TestClient

    from app.http.app import create_app
    from app.settings import Settings

    from .helpers import wait_for_status

    settings = Settings(base_model_id=str(tiny_model_dir / "base-model"), adapter_path=tiny_model_dir / "weights",
                        device="cpu", torch_dtype="float32")
    with TestClient(create_app(settings)) as client:
        wait_for_status(client, "healthy")
        yield client


@pytest.fixture(scope="session")
def postgres():
    """One throwaway PostgreSQL server for the test session. Without PostgreSQL installed the tests that need it
    skip on a developer's machine, and fail in CI (CI=true), where .ci/run installs it: never skipped silently."""
    from .postgres import PostgresServer, binaries

    if binaries() is None:
        message = "PostgreSQL is not installed (Debian: apt-get install postgresql); the job store tests need it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    server = PostgresServer().start()
    yield server
    server.stop()


_databases = iter(range(1, 1_000_000))


@pytest.fixture(params=["sqlite", "postgresql"])
def jobs_db(request, tmp_path) -> str:
    """A JOBS_DB of each kind, empty: an SQLite file, or a new database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "jobs.sqlite3")
    return request.getfixturevalue("postgres").create_database(f"jobs_{next(_databases)}")
