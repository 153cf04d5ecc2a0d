"""mer-cli's Optuna sweeper, a Hydra Sweeper plugin (configs/hydra/sweeper/mer_optuna.yaml).

Hydra instantiates sweepers only from classes it finds under the ``hydra_plugins`` namespace
package, so the plugin class lives here; the search logic is in `mer_cli.search`.
"""
