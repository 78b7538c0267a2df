"""python -m utils.recipe MODEL: the flags train_dreambooth.sh adds to its recipe for MODEL's family, on one line
(none for Stable Diffusion 1.x/2.x and SDXL, whose recipe is the guide's; FLUX.1's and SD3's from diffusers' READMEs,
FLUX.2 [klein]'s from PEFT's image-generation benchmark). The family is read from the model's model_index.json, as the
trainer reads it; a model the trainer would refuse is refused here (exit 2)."""

import sys

from utils.errors import USAGE_EXIT_CODE, UserError


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m utils.recipe MODEL", file=sys.stderr)
        raise SystemExit(USAGE_EXIT_CODE)
    from utils.families import read_family

    try:
        print(" ".join(read_family(argv[0]).launcher_recipe))
    except UserError as error:
        print(f"train_dreambooth.sh: error: {error}", file=sys.stderr)
        raise SystemExit(USAGE_EXIT_CODE) from None


if __name__ == "__main__":
    main()
