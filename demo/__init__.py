"""The pgpool_wsgi demo: a WebOb app, its deployment files and ``run_demo.py`` (``make demo``)."""
