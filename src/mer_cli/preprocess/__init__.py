"""Preprocessing fitted on the training split: target lengths, feature scaling, early fusion's
frame alignment; applied clip by clip to every split."""

from mer_cli.preprocess.streams import *  # noqa: F403  (transitional)
