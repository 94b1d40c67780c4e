"""`python -m broker`: the `broker` command line."""

from broker.cli.root import main

main()
