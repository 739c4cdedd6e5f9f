"""Persona evaluation, one direction only::

    options, entries  ->  evaluate  ->  sweep, compare
           metrics, persona, plots, report  (below them all)

* :mod:`~mlx_persona.eval.options` -- EvalOptions, the prompt set and reference data, EvalError.
* :mod:`~mlx_persona.eval.entries` -- the models: ``[NAME=]SPEC[@ADAPTER]``, resolved first, loaded one at a time.
* :mod:`~mlx_persona.eval.evaluate` -- replies x metrics x validation loss -> a report folder (``mlx-persona eval``).
* :mod:`~mlx_persona.eval.sweep` -- the same metrics over a grid of generation settings (``mlx-persona sweep``).
* :mod:`~mlx_persona.eval.compare` -- a recipe of variants, trained through :mod:`mlx_persona.tuner.run`,
  then evaluated together (``mlx-persona compare``); the only evaluation module that trains.
* :mod:`~mlx_persona.eval.metrics`, :mod:`~mlx_persona.eval.persona` -- per-reply numbers; the persona card.
* :mod:`~mlx_persona.eval.plots` -- every plot (training loss too), as PNG.
* :mod:`~mlx_persona.eval.report` -- markdown, HTML and CSV from what it is handed; it reads no file.

Nothing is imported here, so ``import mlx_persona.eval.metrics`` stays light.
"""
