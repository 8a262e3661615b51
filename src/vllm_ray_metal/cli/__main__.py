import sys

from vllm_ray_metal.cli.main import main

sys.exit(main())
