"""Tooling around the product: benchmarks, the recipe sweep, the results table, the MNIST classifier behind
the in-domain metrics, and the generated flag reference. Each runs from the repository root as
`python -m tools.NAME`."""
