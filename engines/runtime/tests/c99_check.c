/* The public header compiled as C99 (-std=c99 -pedantic -Werror) and a minimal C program on it. */
#include <stdio.h>

#include "hiwin/hiwin.h"

int main(void) {
  hiwin_options opt;
  hiwin_context* ctx = NULL;
  hiwin_plan plan;
  hiwin_status* st;
  hiwin_options_default(&opt);
  st = hiwin_context_create(&opt, &ctx);
  if (st) {
    fprintf(stderr, "%s\n", hiwin_status_message(st));
    hiwin_status_free(st);
    return 1;
  }
  st = hiwin_plan_slices(ctx, 1024, 768, 7, &plan);
  if (st || plan.grid_cols != 3 || plan.grid_rows != 2 || plan.overview_width != 378 || plan.overview_height != 280) {
    fprintf(stderr, "unexpected plan: %s\n", hiwin_status_message(st));
    hiwin_status_free(st);
    hiwin_context_free(ctx);
    return 1;
  }
  st = hiwin_plan_slices(ctx, 1, 5000, 9, &plan); /* too extreme: a status with a message */
  if (hiwin_status_code(st) != HIWIN_BAD_GEOMETRY || hiwin_status_message(st)[0] == '\0') {
    hiwin_status_free(st);
    hiwin_context_free(ctx);
    return 1;
  }
  hiwin_status_free(st);
  hiwin_context_free(ctx);
  printf("c99 ok %s\n", hiwin_version());
  return 0;
}
