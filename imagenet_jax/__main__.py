from imagenet_jax.cli import run

run()
