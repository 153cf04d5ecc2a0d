"""The model comparison report, one step per module (each imports only the ones above it):

options    Settings, and what every report shows (metrics, figure kinds, reference rates)
collect    run directories -> Run, Failure; model labels
prose      the summary's sentences, from the numbers
analysis   runs -> models, intervals, rankings, paired tests: a Comparison (comparison.json)
charts     the figures (matplotlib)
document   a Comparison and its figures -> the report's Blocks
render     Blocks -> Markdown, HTML; a Comparison -> CSV
report     write, into_new_dir (mer-compare), into_sweep (the sweep callback)
"""
