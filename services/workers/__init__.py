"""The services' plain classes (ingest, editor, replica host, evaluator) that Ray actors wrap, and their loop."""
