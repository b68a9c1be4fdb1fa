"""Grid search over ltlearn pipelines on a Dask cluster, through joblib's Dask backend."""

import numpy as np
import pytest
from joblib import parallel_backend
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ltlearn import BalancedSoftmaxClassifier

distributed = pytest.importorskip("distributed")


def _search(digits, n_jobs):
    pipe = make_pipeline(
        StandardScaler(), BalancedSoftmaxClassifier(max_epochs=5, device="cpu", random_state=0)
    )
    grid = {
        "balancedsoftmaxclassifier__tau": [0.0, 1.0],
        "balancedsoftmaxclassifier__lr": [3e-3, 3e-2],
    }
    return GridSearchCV(pipe, grid, cv=3, scoring="balanced_accuracy", n_jobs=n_jobs)


def test_grid_search_on_a_local_cluster_equals_n_jobs_1(digits):
    X, y = digits.X_train, digits.y_train
    serial = _search(digits, n_jobs=1).fit(X, y)
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        # One torch thread per worker: two workers on two cores, not two times two.
        client.run(lambda: __import__("torch").set_num_threads(1))
        with parallel_backend("dask", scatter=[X, y]):
            on_dask = _search(digits, n_jobs=-1).fit(X, y)
        assert len(client.scheduler_info()["workers"]) == 2
    np.testing.assert_allclose(
        on_dask.cv_results_["mean_test_score"], serial.cv_results_["mean_test_score"], atol=1e-12
    )
    assert on_dask.best_params_ == serial.best_params_
