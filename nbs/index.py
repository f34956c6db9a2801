# %% [markdown]
# # moe-lit
# > Mixture-of-Experts layers with expert parallelism, rebuilt small, correct by construction, and explained.

# %% [markdown]
# placeholder
