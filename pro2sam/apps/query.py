"""Choosing rows of a labels table with DuckDB SQL, for ``pro2sam show`` and the demo's page.

DuckDB is an application dependency: the library (:mod:`pro2sam.gallery`) renders the rows it is
given and knows nothing of SQL.
"""

from __future__ import annotations

from ..export import parquet_files
from ..gallery import DEFAULT_LIMIT, DEFAULT_THUMB_SIZE, write_gallery
from ..storage import filesystem, is_remote

__all__ = ["select_rows", "build_gallery"]


def select_rows(
    input: str,
    *,
    where: str | None = None,
    limit: int = DEFAULT_LIMIT,
    sample: bool = False,
    seed: int = 0,
    coarse_map: bool = False,
) -> list[dict]:
    """Rows of the labels table at ``input`` (file or folder, local or URI).

    Args:
        where: a DuckDB SQL condition over the table's columns, e.g.
            ``"match_score > 0.5 AND status = 'ok'"``.
        limit: at most this many rows.
        sample: a random sample (reservoir, repeatable with ``seed``) of the rows that pass
            ``where``, instead of the best ``match_score`` first.
        coarse_map: also read the ``coarse_map`` column (left out by default for its size).

    Returns:
        Dicts keyed by the labels table's column names, plus ``class_score`` (top-1 probability).
    """
    import duckdb

    files = parquet_files(input)
    con = duckdb.connect()
    try:
        if is_remote(input):
            fs, _ = filesystem(input)
            con.register_filesystem(fs)
        columns = "*" if coarse_map else "* EXCLUDE (coarse_map)"
        # One row per image, should a table hold two (its ok row first), as LabelsOutput reads it.
        one_per_image = "QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY status = 'ok' DESC) = 1"
        filtered = (
            f"SELECT * FROM (SELECT {columns} FROM read_parquet($files, union_by_name = true) {one_per_image})"
            + (f" WHERE ({where})" if where else "")
        )
        if sample:
            sample_clause = f"USING SAMPLE reservoir({int(limit)} ROWS) REPEATABLE ({int(seed)})"
            sql = f"SELECT * FROM ({filtered}) {sample_clause} ORDER BY image_id"
        else:
            sql = f"{filtered} ORDER BY match_score DESC NULLS LAST, image_id LIMIT {int(limit)}"
        result = con.execute(sql, {"files": files})
        names = [d[0] for d in result.description]
        rows = [dict(zip(names, values)) for values in result.fetchall()]
    finally:
        con.close()
    for row in rows:
        row["class_score"] = row["topk_scores"][0] if row.get("topk_scores") else None
    return rows


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
) -> int:
    """The gallery (:func:`pro2sam.gallery.write_gallery`) of the rows :func:`select_rows` chooses;
    returns the number of overlays."""
    rows = select_rows(input, where=where, limit=limit, sample=sample, seed=seed, coarse_map=coarse_map)
    chosen = f"where {where}" if where else "all rows"
    order = f"random sample (seed {seed})" if sample else "best match_score first"
    return write_gallery(
        rows, output, source=input, selection=f"{chosen}; {order}", limit=limit,
        thumb_size=thumb_size, threads=threads, coarse_map=coarse_map,
    )  # fmt: skip
