from imagenet_jax.cli import run

if __name__ == "__main__":  # not when a spawned reader process imports it
    run()
