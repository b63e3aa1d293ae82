"""Throughput benchmarks behind ``fastseq bench`` (harness, peers, machine facts)."""
