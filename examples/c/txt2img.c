/* txt2img with the built-in demo model through the C ABI: writes a binary PPM.
 * Build: cc -std=c99 txt2img.c $(pkg-config --cflags --libs toffee) -o txt2img
 * Usage: ./txt2img out.ppm [seed] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "toffee.h"

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s out.ppm [seed]\n", argv[0]);
        return 2;
    }
    if (toffee_abi_version() != TOFFEE_ABI_VERSION) {
        fprintf(stderr, "libtoffee ABI %u, header %u\n", toffee_abi_version(), TOFFEE_ABI_VERSION);
        return 1;
    }
    toffee_engine_options eo;
    memset(&eo, 0, sizeof eo);
    eo.size = sizeof eo; /* no model: the built-in demo model, on the CPU */
    toffee_engine *engine = NULL;
    if (toffee_engine_open(&eo, &engine) != TOFFEE_OK) {
        fprintf(stderr, "open: %s\n", toffee_last_error());
        return 1;
    }
    toffee_generate_options go;
    memset(&go, 0, sizeof go);
    go.size = sizeof go;
    go.mode = 0;
    go.prompt = "a red fox";
    go.num_images = 1;
    go.steps = 3;
    go.guidance = 7.5f;
    go.seed = argc > 2 ? strtoull(argv[2], NULL, 10) : 0;
    go.adapter_scale = -1.0f;
    toffee_image img;
    if (toffee_generate(engine, &go, &img) != TOFFEE_OK) {
        fprintf(stderr, "generate: %s\n", toffee_last_error());
        toffee_engine_close(engine);
        return 1;
    }
    FILE *f = fopen(argv[1], "wb");
    if (!f) {
        perror(argv[1]);
        return 1;
    }
    fprintf(f, "P6\n%u %u\n255\n", img.width, img.height);
    fwrite(img.data, 1, (size_t)img.width * img.height * 3, f);
    fclose(f);
    toffee_image_free(&img);
    toffee_engine_close(engine);
    return 0;
}
