"""The maths every part shares, below train, weighting, selection and eval: the per-sample loss (losses.py) and
the bi-level hypergradient (bilevel.py). Imports only torch and dwm.data."""
