"""Benchmarks: tau, speedup and throughput on GSM8K, MATH-500, HumanEval, MBPP and MT-Bench,
in process (dflash/bench/local.py) or over HTTP (dflash/bench/http.py); figures in report.py."""
