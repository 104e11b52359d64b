"""Privacy: noise mechanisms (used by the DP aggregators) and privacy accounting on ``dp_accounting``.

Accounting answers "how much privacy has this run spent?" in the run itself: :class:`PrivacyLedger` gives the
epsilon after any number of rounds for the run's events (:func:`sampled_run_events` for Poisson or fixed-size
sampling, :func:`tree_run_events` for DP-FTRL's tree, :func:`matrix_factorization_run_events` for
matrix-factorization DP-FTRL on :func:`matrix_factorization`'s BLT/BandMF/Toeplitz strategies, built on
``jax_privacy``), :func:`planned_epsilon` plans a run, and
:func:`calibrate_noise_multiplier` (and :func:`calibrate_run_noise` for any run) finds the noise for a
target ``(epsilon, delta)``. :mod:`~fedjax_lite.privacy.local` has the local-DP mechanisms (Gaussian and Laplace on
a clipped value, k-ary randomized response and its unbiased decoder) and each client's epsilon;
:func:`example_level_epsilon` accounts example-level DP-SGD inside clients (``algorithms.ExampleDp``);
:func:`audit` estimates epsilon empirically from canary clients (Andrew et al. 2024). An accountant is named by
``'rdp'``/``'pld'``, given by its parameters, or passed as your own ``dp_accounting`` accountant; the PLD
accountant chooses its discretization from the requested accuracy (``accounting``'s module docstring).
"""

from fedjax_lite.privacy.accounting import (
    ACCOUNTANTS,
    DEFAULT_PLD_RELATIVE_ACCURACY,
    PrivacyLedger,
    RunEvents,
    calibrate_noise_multiplier,
    check_accountant,
    describe_accountant,
    epsilon_of,
    halve_gaussian_noise,
    make_accountant,
    merge_gaussians,
    planned_epsilon,
    run_epsilon,
    sampled_run_events,
    tree_run_events,
)
from fedjax_lite.privacy.example_level import example_level_epsilon, example_level_run_events, local_steps
from fedjax_lite.privacy.matrix_factorization import (
    MatrixFactorization,
    NoiseGenerator,
    calibrate_run_noise,
    matrix_factorization,
    matrix_factorization_run_events,
)
from fedjax_lite.privacy.audit import AuditResult, audit, canary_cosines, canary_directions, gdp_epsilon
from fedjax_lite.privacy.local import (
    decode_randomized_response,
    local_dp_event,
    local_epsilon,
    randomized_response,
    randomized_response_event,
    randomized_response_probabilities,
)
from fedjax_lite.privacy.mechanisms import add_gaussian_noise, gaussian_noise, laplace_noise

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_PLD_RELATIVE_ACCURACY",
    "MatrixFactorization",
    "NoiseGenerator",
    "PrivacyLedger",
    "RunEvents",
    "AuditResult",
    "add_gaussian_noise",
    "audit",
    "canary_cosines",
    "canary_directions",
    "calibrate_noise_multiplier",
    "calibrate_run_noise",
    "check_accountant",
    "decode_randomized_response",
    "describe_accountant",
    "epsilon_of",
    "example_level_epsilon",
    "example_level_run_events",
    "gaussian_noise",
    "gdp_epsilon",
    "halve_gaussian_noise",
    "laplace_noise",
    "local_dp_event",
    "local_epsilon",
    "local_steps",
    "make_accountant",
    "matrix_factorization",
    "matrix_factorization_run_events",
    "merge_gaussians",
    "planned_epsilon",
    "randomized_response",
    "randomized_response_event",
    "randomized_response_probabilities",
    "run_epsilon",
    "sampled_run_events",
    "tree_run_events",
]
