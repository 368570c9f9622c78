"""edge-agent's cloud side (console script `fleet`): publish models, collect what devices report."""
