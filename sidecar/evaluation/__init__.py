"""`sidecar eval`: a labelled set run through the running daemon, scored and reported.

confidence (is the reply's confidence worth anything: calibration, AUROC, coverage),
scores (accuracy, macro-F1, per-field F1, latency), dataset (reading labelled sets),
runner (the rows through a client, at low priority), summary (the report's numbers and the
terminal table), html (the self-contained report), fit (a threshold fitted to a target).
"""
