"""Evaluation and benchmarks on top of qkv_core: the QA evaluation runner and its metrics, the
multi-hop relay, reports and charts, and the `qkvcomm bench` suites. qkv_core never imports it."""
