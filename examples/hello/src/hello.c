/* The program the example recipe compiles inside the sandbox. */
#include <stdio.h>

int main(void) {
    printf("Hello from a Kiln build!\n");
    return 0;
}
