"""`python -m trl_midalign.cli`: the `trl-midalign` command."""

from . import main


main()
