"""Markov chain kernels: one ``init``/``step`` interface, flow independence MH, HMC, the hybrid.

- :mod:`flowmc.mcmc.rng`: per-chain random streams;
- :mod:`flowmc.mcmc.kernel`: the kernel interface and the cycle (composition) of kernels;
- :mod:`flowmc.mcmc.imh`: independence Metropolis–Hastings with a flow proposal;
- :mod:`flowmc.mcmc.hmc`: Hybrid Monte Carlo (leapfrog/Omelyan, step-size tuning);
- :mod:`flowmc.mcmc.hybrid`: flow proposals cycled with HMC trajectories.
"""
