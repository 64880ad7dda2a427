"""Throughput and memory benchmarks of adclr (pytest-benchmark) and their report tool.

    pytest bench/ --benchmark-json=results.json    # full matrix on CUDA, small subset on CPU
    python -m bench.report results.json            # -> report.md + chart.png
"""
