"""The answer to a request for several pages: each page's own answer, and the pages joined in page order."""

from __future__ import annotations

from app.errors import ServiceError
from app.request_context import current_request_id
from app.service.schemas import ErrorBody, InferMetadata, InferResponse, PageResult, TableData

# When pages ended differently, the joined answer reports the one that matters most to a reader.
_FINISH_PRIORITY = {"length": 2, "repetition": 1, "stop": 0}


def page_entry(page: int, outcome: InferResponse | ServiceError) -> PageResult:
    if isinstance(outcome, ServiceError):
        return PageResult(page=page, error=ErrorBody(type=outcome.error_type, message=outcome.message,
                                                     request_id=current_request_id()))
    rows = [row.model_copy(update={"page": page}) for row in outcome.rows] if outcome.rows is not None else None
    return PageResult(page=page, description=outcome.description, table=outcome.table, rows=rows,
                      table_error=outcome.table_error, metadata=outcome.metadata)


def join_pages(outcomes: list[tuple[int, InferResponse | ServiceError]], inference_time_s: float) -> InferResponse:
    """One response for all pages; raises the first page's error when no page has an answer."""
    entries = [page_entry(page, outcome) for page, outcome in outcomes]
    answered = [entry for entry in entries if entry.error is None]
    if not answered:
        raise next(outcome for _, outcome in outcomes if isinstance(outcome, ServiceError))
    tables = [entry for entry in answered if entry.table is not None]
    table = None
    if tables:
        columns = tables[0].table.columns
        warnings = [f"page {entry.page}: {warning}" for entry in tables for warning in entry.table.warnings]
        warnings += [f"page {entry.page}: its columns differ from page {tables[0].page}'s" for entry in tables[1:]
                     if entry.table.columns != columns]
        table = TableData(columns=columns, rows=[row for entry in tables for row in entry.table.rows],
                          truncated=any(entry.table.truncated for entry in tables),
                          dropped_incomplete_row=any(entry.table.dropped_incomplete_row for entry in tables),
                          warnings=warnings)
    with_rows = [entry for entry in answered if entry.rows is not None]
    failed = [entry.page for entry in entries if entry.error is not None]
    return InferResponse(
        description="\n\n".join(entry.description for entry in answered),
        table=table,
        rows=[row for entry in with_rows for row in entry.rows] if with_rows else None,
        table_error=None if table and not failed else "; ".join(
            ([f"page(s) {', '.join(map(str, failed))} have no answer (see pages)"] if failed else [])
            + ([] if table else ["no page holds a table"])),
        metadata=_joined_metadata([entry.metadata for entry in answered], inference_time_s),
        pages=entries,
    )


def _joined_metadata(pages: list[InferMetadata], inference_time_s: float) -> InferMetadata:
    """The first page's metadata, with the totals of all pages."""
    return pages[0].model_copy(update={
        "inference_time": round(inference_time_s, 4),
        "generation_time": max(page.generation_time for page in pages),
        "preprocess_time": max(page.preprocess_time for page in pages),
        "queue_time": max(page.queue_time for page in pages),
        "image_tokens": sum(page.image_tokens for page in pages),
        "prompt_tokens": sum(page.prompt_tokens for page in pages),
        "completion_tokens": sum(page.completion_tokens for page in pages),
        "finish_reason": max((page.finish_reason for page in pages), key=lambda r: _FINISH_PRIORITY.get(r, 0)),
    })
