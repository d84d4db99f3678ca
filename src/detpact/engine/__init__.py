"""Training engine: the loop, optimisation, EMA, guards and the runtime set-up."""
