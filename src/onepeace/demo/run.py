"""``onepeace demo``: build the held-out part of the demo corpus, search it with example queries of every kind,
write an HTML report and print the held-out retrieval metrics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from onepeace.corpus.items import cache_dir
from onepeace.demo.gallery import Gallery, Hit, read_items
from onepeace.demo.queries import Query, example_queries


@dataclass(frozen=True)
class DemoOptions:
    model: str = "onepeace-small"
    out: Path = Path("out/demo")
    corpus: Path | None = None
    """Corpus folder (default: a cache folder); its held-out split is built or brought up to date."""
    fsdd: Path | None = None
    limit: int | None = None
    """At most this many held-out items per source (a quicker, smaller demo)."""
    top_k: int = 5
    batch_size: int = 32


@dataclass(frozen=True)
class DemoResult:
    report: Path
    metrics_files: tuple[Path, ...]
    results: tuple[tuple[Query, tuple[Hit, ...]], ...]


def _stage(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _build_corpus(options: DemoOptions) -> Path:
    from onepeace.corpus.build import BuildOptions, build_demo_corpus
    from onepeace.corpus.sources import all_sources

    corpus = options.corpus or cache_dir() / "demo-corpus"
    build = BuildOptions(splits=("heldout",), limit=options.limit)
    for r in build_demo_corpus(corpus, all_sources(fsdd=options.fsdd), build):
        print(
            f"  {r.name:12s} {r.items['heldout']} held-out items" if r.status == "ok" else f"  {r.name:12s} {r.status}"
        )
    return corpus


def _print_hits(query: Query, hits: tuple[Hit, ...]) -> None:
    print(f"\n{query.kind}: {query.describe()}")
    for rank, hit in enumerate(hits, 1):
        mark = "  <- right" if query.is_right(hit.entry) else ""
        where = f" ({hit.entry.path.name})" if hit.entry.path else ""
        print(f"  {rank}. {hit.score:6.3f}  {hit.entry.text}{where}{mark}")


def run_demo(options: DemoOptions) -> DemoResult:
    """The whole demo; progress and results are printed as it goes."""
    import onepeace
    from onepeace.demo.html import write_report
    from onepeace.evaluate.report import format_table, write_reports
    from onepeace.evaluate.retrieval import evaluate_retrieval

    _stage("1/4 corpus: the held-out split of the demo corpus (cached; sources that are not installed are skipped)")
    corpus = _build_corpus(options)
    _stage(f"2/4 model: {options.model}")
    model = onepeace.load(options.model)
    items = read_items(corpus)
    print(f"  {sum(p.numel() for p in model.model.parameters()):,} parameters; gallery of {len(items)} items")
    _stage("3/4 index and example queries")
    gallery = Gallery.build(model, corpus, items, options.batch_size)
    results = []
    for query in example_queries(corpus, items):
        hits = tuple(gallery.search(query.embed(model), query.target, options.top_k))
        _print_hits(query, hits)
        results.append((query, hits))
    _stage("4/4 held-out retrieval metrics")
    report = evaluate_retrieval(model, corpus, model_name=options.model, batch_size=options.batch_size)
    files = tuple(write_reports(report, options.out))
    table = format_table(report)
    intro = f"Model {options.model}; gallery: the held-out split of the demo corpus ({len(items)} items)."
    page = write_report(options.out / "report.html", "onepeace demo", intro, results, table)
    print(table)
    print(f"\nreport: {page}\nmetrics: {', '.join(str(f) for f in files)}", flush=True)
    return DemoResult(page, files, tuple(results))
