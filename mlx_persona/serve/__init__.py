"""`mlx-persona serve`: one model behind an OpenAI-compatible HTTP API (Starlette on uvicorn).

- :mod:`.schema`: request bodies checked and turned into a :class:`~mlx_persona.sampling.GenerationConfig`
  (the rule for every OpenAI field), and OpenAI-style errors (``APIError``);
- :mod:`.worker`: the one thread that owns the model, its bounded queue, cancellation;
- :mod:`.responses`: the OpenAI response bodies, whole and streamed;
- :mod:`.app`: the routes and the guard (Host header, API key, body bounds);
- :mod:`.server`: the process: bind, load, run uvicorn (with a deadline for request heads).

Needs the ``serve`` extra (starlette, uvicorn); nothing here is imported by the rest of the package.
"""
