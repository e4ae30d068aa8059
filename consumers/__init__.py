"""One module per stage. Each is thin glue, readable top to bottom: take the
decoded events, call domain and infra, return the events to emit next. The
runner (infra/kafka/runner.py) does consuming, retries, dead letters, commits."""

STAGES = ("parse", "split", "embed", "load_vectors", "index_keywords", "track_status")
