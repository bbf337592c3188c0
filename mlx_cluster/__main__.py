from mlx_cluster.cli import main

main()
