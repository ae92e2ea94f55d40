from jax_sparsek.demo.run import main

main()
