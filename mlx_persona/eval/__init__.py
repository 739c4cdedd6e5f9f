"""Persona evaluation, one direction only::

    options, entries  ->  evaluate  ->  sweep, compare
           metrics, persona, verdict, plots, report, sweep_report, markup  (below them all)

* :mod:`~mlx_persona.eval.options` -- EvalOptions, the prompt set and reference data, EvalError.
* :mod:`~mlx_persona.eval.entries` -- the models: ``[NAME=]SPEC[@ADAPTER]``, resolved first, loaded one at a time.
* :mod:`~mlx_persona.eval.evaluate` -- replies x metrics x validation loss -> a report folder (``mlx-persona eval``).
* :mod:`~mlx_persona.eval.sweep` -- the same metrics over a grid of generation settings (``mlx-persona sweep``).
* :mod:`~mlx_persona.eval.compare` -- a recipe of variants, trained through :mod:`mlx_persona.tuner.run`,
  then evaluated together (``mlx-persona compare``); the only evaluation module that trains.
* :mod:`~mlx_persona.eval.metrics`, :mod:`~mlx_persona.eval.persona` -- per-reply numbers and which way each
  is better; the persona card.
* :mod:`~mlx_persona.eval.verdict` -- each fine-tuned model against its base and the reference, as data.
* :mod:`~mlx_persona.eval.plots` -- every plot (training loss too), as PNG, one colour per model.
* :mod:`~mlx_persona.eval.report`, :mod:`~mlx_persona.eval.sweep_report` -- markdown, HTML and CSV from what
  they are handed (formatting shared in :mod:`~mlx_persona.eval.markup`); they read no file.

Nothing is imported here, so ``import mlx_persona.eval.metrics`` stays light.
"""
