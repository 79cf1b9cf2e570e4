"""Drift monitoring: is a new batch still like the data the champion was trained on, and should we retrain?

- `profile`: the reference profile of a model (image statistics, embeddings,
  softmax outputs) and the profile of a batch, computed the same way;
- `detectors`: the two-sample tests, each with statistic, p-value and threshold;
- `check`: one batch against the champion's reference, every detector that applies;
- `policy`: what to do with a checked batch, and whether to retrain now;
- `report`: the JSON and HTML reports and the MLflow monitoring run of a check;
- `landing`: the landing area new batches arrive in (local or S3);
- `shifts`: synthetic shifts (brightness, noise, rotation, class priors) for tests and demos.
"""
