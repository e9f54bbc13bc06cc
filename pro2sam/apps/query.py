"""Choosing rows of a labels table with DuckDB SQL: ``pro2sam show`` (a gallery of the rows),
``pro2sam export --where`` (the ids of the rows to export) and the demo's page.

DuckDB is an application dependency: the library renders the rows (:mod:`pro2sam.gallery`) or
exports the images (:mod:`pro2sam.export`) it is given and knows nothing of SQL.

A selection is a condition (``where``), an order (``order_by`` a column, ascending or not; rows
without a value last) and a window (``offset``, ``limit``), so that "review the worst 200, export
the rest" is the same order twice: ``show --order-by confidence --ascending --limit 200`` and
``export --order-by confidence --ascending --offset 200``. Besides the table's columns, SQL may use
``class_score`` (the top-1 probability).
"""

from __future__ import annotations

import pyarrow as pa

from ..gallery import DEFAULT_LIMIT, DEFAULT_THUMB_SIZE, write_gallery
from ..labels import LABEL_SCHEMA
from ..reading import parquet_files
from ..storage import filesystem, is_remote

__all__ = ["ORDER_COLUMNS", "DEFAULT_ORDER", "select_rows", "select_image_ids", "build_gallery"]

# What a selection may be ordered by: every scalar column, and the top-1 probability.
ORDER_COLUMNS = tuple(
    f.name for f in LABEL_SCHEMA if not (pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type) or pa.types.is_struct(f.type))
) + ("class_score",)
DEFAULT_ORDER = "match_score"
_ID_CHUNK = 100_000


def _order_clause(order_by: str | None, ascending: bool) -> str:
    order_by = order_by or DEFAULT_ORDER
    if order_by not in ORDER_COLUMNS:
        raise ValueError(f"--order-by {order_by!r}: choose one of {', '.join(ORDER_COLUMNS)}")
    return f"ORDER BY {order_by} {'ASC' if ascending else 'DESC'} NULLS LAST, image_id"


def _all_rows(result) -> tuple[list[str], list[tuple]]:
    return [d[0] for d in result.description], result.fetchall()


def _query(input: str, sql_of_table, read=_all_rows):
    """Run ``sql_of_table(table_sql)`` over the labels table at ``input``, one row per image
    (its ok row first, as :class:`~pro2sam.output.LabelsOutput` reads it); ``table_sql`` is a
    subquery with the table's columns and ``class_score``. Returns ``read(result)``: by default
    (column names, rows)."""
    import duckdb

    files = parquet_files(input)
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    try:
        con.execute("SET enable_progress_bar = false")
        if is_remote(input):
            fs, _ = filesystem(input)
            con.register_filesystem(fs)
        _lock_down(con, files)
        one_per_image = "QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY status = 'ok' DESC) = 1"
        table = f"SELECT *, topk_scores[1] AS class_score FROM read_parquet($files, union_by_name = true) {one_per_image}"
        try:
            result = con.execute(sql_of_table(table), {"files": files})
        except duckdb.PermissionException as e:  # read_csv('/etc/passwd'), an https:// URL, SET ...
            raise ValueError(
                f"the selection's SQL may use the labels table's columns only, not other files, URLs or settings: "
                f"{_first_line(e)}"
            ) from None
        except duckdb.Error as e:  # a typo in --where: say what DuckDB said, in one line
            raise ValueError(f"the selection's SQL failed: {_first_line(e)}") from None
        return read(result)
    finally:
        con.close()


def _lock_down(con, files: list[str]) -> None:
    """Let the connection read the label files ``files`` and nothing else: no other file or URL
    (DuckDB's external access off, the label files its only allowed paths), no extension loaded
    or installed on demand (httpfs), and no setting changed after this (the SQL of ``--where``
    runs inside the query)."""
    con.execute("SET allowed_paths = $files", {"files": files})
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def select_rows(
    input: str,
    *,
    where: str | None = None,
    limit: int = DEFAULT_LIMIT,
    sample: bool = False,
    seed: int = 0,
    coarse_map: bool = False,
    order_by: str | None = None,
    ascending: bool = False,
    offset: int = 0,
) -> list[dict]:
    """Rows of the labels table at ``input`` (file or folder, local or URI).

    Args:
        where: a DuckDB SQL condition over the table's columns, e.g.
            ``"match_score > 0.5 AND status = 'ok'"``.
        limit: at most this many rows.
        sample: a random sample (reservoir, repeatable with ``seed``) of the rows that pass
            ``where``, instead of the first rows of the order.
        coarse_map: also read the ``coarse_map`` column (left out by default for its size).
        order_by: one of :data:`ORDER_COLUMNS` (default ``match_score``); rows without a value last.
        ascending: lowest first (the most doubtful, for a score) instead of highest first.
        offset: skip this many rows of the order first.

    Returns:
        Dicts keyed by the labels table's column names, plus ``class_score`` (top-1 probability).
    """
    order = _order_clause(order_by, ascending)
    columns = "*" if coarse_map else "* EXCLUDE (coarse_map)"

    def sql(table: str) -> str:
        filtered = f"SELECT {columns} FROM ({table})" + (f" WHERE ({where})" if where else "")
        if sample:
            sample_clause = f"USING SAMPLE reservoir({int(limit)} ROWS) REPEATABLE ({int(seed)})"
            return f"SELECT * FROM ({filtered}) {sample_clause} ORDER BY image_id"
        return f"{filtered} {order} LIMIT {int(limit)} OFFSET {int(offset)}"

    names, values = _query(input, sql)
    return [dict(zip(names, row)) for row in values]


def select_image_ids(
    input: str,
    *,
    where: str | None = None,
    order_by: str | None = None,
    ascending: bool = False,
    limit: int | None = None,
    offset: int = 0,
) -> pa.Array:
    """The ``image_id`` of the rows a selection keeps (same arguments as :func:`select_rows`;
    ``limit`` None: no limit), as one pyarrow string array: 20 bytes an image, so a million
    ids take about 25 MB."""
    order = _order_clause(order_by, ascending)
    window = (f" LIMIT {int(limit)}" if limit is not None else "") + (f" OFFSET {int(offset)}" if offset else "")

    def sql(table: str) -> str:
        return f"SELECT image_id FROM ({table})" + (f" WHERE ({where})" if where else "") + f" {order}{window}"

    def read(result) -> pa.Array:  # in chunks: never a million Python tuples at once
        chunks = [pa.array([], pa.string())]
        while rows := result.fetchmany(_ID_CHUNK):
            chunks.append(pa.array([r[0] for r in rows], pa.string()))
        return pa.concat_arrays(chunks)

    return _query(input, sql, read)


def build_gallery(
    input: str,
    output: str,
    *,
    where: str | None = None,
    limit: int = DEFAULT_LIMIT,
    sample: bool = False,
    seed: int = 0,
    thumb_size: int = DEFAULT_THUMB_SIZE,
    threads: int = 8,
    coarse_map: bool = False,
    order_by: str | None = None,
    ascending: bool = False,
    offset: int = 0,
) -> int:
    """The gallery (:func:`pro2sam.gallery.write_gallery`) of the rows :func:`select_rows` chooses;
    returns the number of overlays."""
    rows = select_rows(
        input, where=where, limit=limit, sample=sample, seed=seed, coarse_map=coarse_map,
        order_by=order_by, ascending=ascending, offset=offset,
    )  # fmt: skip
    chosen = f"where {where}" if where else "all rows"
    if sample:
        order = f"random sample (seed {seed})"
    else:
        order = f"{order_by or DEFAULT_ORDER} {'lowest' if ascending else 'highest'} first" + (
            f", from the {offset + 1}th" if offset else ""
        )
    return write_gallery(
        rows, output, source=input, selection=f"{chosen}; {order}", limit=limit,
        thumb_size=thumb_size, threads=threads, coarse_map=coarse_map,
    )  # fmt: skip
