"""The study report, built from the results database alone (it never writes a run record).

collect  database rows -> StudyData (strategies aggregated over seeds: Stat, StrategyResult)
tables   StudyData -> Table (quality, cost, quantization, deployment, runs)
render   Tables -> text, markdown, HTML; the report documents; results.csv
plots    StudyData -> PNG bytes (cost bars, loss curves, Pareto view)
write    write_report: the files of a study folder, written atomically
"""
