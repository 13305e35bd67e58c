"""benchlib: the pieces of scripts/bench (docs/PERFORMANCE.md).

main (options, suites, output) -> suite_* (what is measured and compared with what) ->
workloads / systems / limits (doing it) -> mounts, s3, s3bench, proxy, memfs, runner, report
(plumbing). Nothing here is imported by cssfs; it imports cssfs only to check sizes and open
envelopes when verifying what a workload wrote.
"""
