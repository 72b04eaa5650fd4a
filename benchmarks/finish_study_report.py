"""Tables of the as-trained / finished study: docs/study/tables_finished.md (and printed).

    python benchmarks/finish_study_report.py [--store PATH] [--out PATH]
"""
import argparse
from pathlib import Path

from softrank.study.analysis import finished_view, markdown_report, stationarity_report
from softrank.study.store import ResultStore, write_csv

p = argparse.ArgumentParser()
p.add_argument("--store", default="benchmarks/results/finish_study.sqlite")
p.add_argument("--out", default="docs/study/tables_finished.md")
p.add_argument("--csv", default="docs/study/results_finished.csv")
args = p.parse_args()
with ResultStore(args.store) as store:
    rows = store.rows()
text = ("## Estimates as trained and finished\n\n" + stationarity_report(rows)
        + "\n## Finished nets: every measure\n\n" + markdown_report(finished_view(rows)))
Path(args.out).write_text(text)
write_csv(args.csv, rows)
print(text)
