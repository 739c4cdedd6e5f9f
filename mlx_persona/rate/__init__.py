"""Blind pairwise rating of models' replies (``mlx-persona rate``), in the browser or by a judge model.

inputs (replies from an eval's results.jsonl, or generated) -> store (the SQLite database) -> schedule
(which pair next, which side) -> app + server (the page) or judge (an OpenAI-compatible endpoint) ->
summary (win rates, Wilson intervals, Bradley-Terry, agreement; the numbers in stats).
"""
