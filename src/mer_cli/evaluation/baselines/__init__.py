"""Classic baselines beside the deep models: fitted on a run's training split, their settings
chosen on its validation split, scored on its test split like the models (`suite.compute`)."""
