"""``python -m mlx_persona`` and the ``mlx-persona`` command: the Linux speed layer, then the CLI."""


def main(args=None, **kwargs):
    """Sets the backend up before anything imports mlx, then runs the click group (same arguments)."""
    from mlx_persona import backend

    backend.setup()
    from mlx_persona.cli import main as cli

    return cli.main(args, **kwargs)


if __name__ == "__main__":
    main()
