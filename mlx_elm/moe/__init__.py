"""MoE tooling around the layers of ``mlx_elm.models.moe``: routing statistics and plots
(``stats``) and the expert-dispatch benchmark (``bench``)."""
