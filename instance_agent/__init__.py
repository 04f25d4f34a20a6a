"""The instance agent: one process per loaded model, serving /health, /run and /stream."""
