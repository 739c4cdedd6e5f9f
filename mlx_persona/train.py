"""``python -m mlx_persona.train`` is ``mlx-persona train``. The trainer itself is :mod:`mlx_persona.tuner`."""

import sys

if __name__ == "__main__":
    from mlx_persona.__main__ import main

    main(["train", *sys.argv[1:]], prog_name="python -m mlx_persona.train")
