"""`python -m broker.cli`."""

from broker.cli.root import main

main()
