"""`python -m sam_cls`: the `sam-cls` command, as torchrun starts it (torchrun ... -m sam_cls train ...)."""

from sam_cls.cli import main

if __name__ == "__main__":
    main(prog_name="sam-cls")
