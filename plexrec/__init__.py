"""The top of the house: the `plexrec` command line (cli.py) and the quickstart that runs the
whole loop (quickstart.py). They import the rest; nothing imports them."""
