"""Threads, worker processes, bounded channels and accounting behind the pipelines."""
