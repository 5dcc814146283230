/* Region-of-interest JPEG decoding with libjpeg-turbo, for mae_bench/data/jpeg_region.py.
 *
 * A DataLoader worker needs only the crop box of each image: jpeg_crop_scanline() limits the
 * inverse DCT, upsampling and colour conversion to the box's columns (widened to whole iMCUs),
 * jpeg_skip_scanlines() skips the work of the rows above it, and decoding stops after its last
 * row. The pixels are those of a full decode cut to the box: the box is widened by one pixel on
 * each side that is not the image's edge, because libjpeg's fancy chroma upsampling treats the
 * edges of a cropped region as image edges.
 *
 * Plain C with an int status and a message buffer, so that Python calls it through ctypes (which
 * releases the GIL during the call). libjpeg's errors and warnings (corrupt data) both end the
 * decode with -1; the caller then decodes the file the ordinary way, which gives today's verdict.
 */
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

#define MB_MSG_LEN 200 /* the caller's message buffer holds at least this many bytes */

struct mb_error {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
  char *msg;
};

static void mb_error_exit(j_common_ptr cinfo) {
  struct mb_error *err = (struct mb_error *)cinfo->err;
  char text[JMSG_LENGTH_MAX];
  (*cinfo->err->format_message)(cinfo, text);
  snprintf(err->msg, MB_MSG_LEN, "%s", text);
  longjmp(err->jump, 1);
}

/* level -1: a warning (corrupt or truncated data): an error here. Other levels: trace output. */
static void mb_emit_message(j_common_ptr cinfo, int level) {
  if (level < 0) mb_error_exit(cinfo);
}

static void mb_setup(struct jpeg_decompress_struct *cinfo, struct mb_error *err, char *msg) {
  cinfo->err = jpeg_std_error(&err->pub);
  err->pub.error_exit = mb_error_exit;
  err->pub.emit_message = mb_emit_message;
  err->msg = msg;
  msg[0] = '\0';
}

/* The work of both entry points below; header_only: stop after the header. */
static int mb_decode(const unsigned char *data, unsigned long size, int header_only, int *height,
                     int *width, int denom, int top, int left, int rows_wanted, int cols_wanted,
                     unsigned char *out, unsigned long capacity, int *x0, int *cols, char *msg) {
  struct jpeg_decompress_struct cinfo;
  struct mb_error err;
  mb_setup(&cinfo, &err, msg);
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, size);
  jpeg_read_header(&cinfo, TRUE);
  *height = (int)cinfo.image_height;
  *width = (int)cinfo.image_width;
  if (header_only) {
    jpeg_destroy_decompress(&cinfo);
    return 0;
  }
  cinfo.out_color_space = JCS_RGB;
  cinfo.scale_num = 1;
  cinfo.scale_denom = (unsigned int)denom;
  jpeg_start_decompress(&cinfo);
  int out_h = (int)cinfo.output_height, out_w = (int)cinfo.output_width;
  if (top < 0 || left < 0 || rows_wanted < 1 || cols_wanted < 1 || top + rows_wanted > out_h ||
      left + cols_wanted > out_w) {
    snprintf(msg, MB_MSG_LEN, "box (%d, %d, %d, %d) outside the %dx%d image", top, left,
             rows_wanted, cols_wanted, out_h, out_w);
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  int margin_left = left > 0, margin_right = left + cols_wanted < out_w;
  JDIMENSION x = (JDIMENSION)(left - margin_left);
  JDIMENSION w = (JDIMENSION)(cols_wanted + margin_left + margin_right);
  if (w < cinfo.output_width) jpeg_crop_scanline(&cinfo, &x, &w);
  if ((unsigned long)rows_wanted * w * 3 > capacity) {
    snprintf(msg, MB_MSG_LEN, "output buffer of %lu bytes too small", capacity);
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  if (top > 0 && jpeg_skip_scanlines(&cinfo, (JDIMENSION)top) != (JDIMENSION)top) {
    snprintf(msg, MB_MSG_LEN, "could not skip to row %d", top);
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  JSAMPROW rows[16];
  int done = 0;
  while (done < rows_wanted) {
    int n = rows_wanted - done < 16 ? rows_wanted - done : 16;
    for (int i = 0; i < n; i++) rows[i] = out + ((size_t)(done + i)) * w * 3;
    JDIMENSION got = jpeg_read_scanlines(&cinfo, rows, (JDIMENSION)n);
    if (got == 0) {
      snprintf(msg, MB_MSG_LEN, "no scanline after row %d", top + done);
      jpeg_destroy_decompress(&cinfo);
      return -1;
    }
    done += (int)got;
  }
  *x0 = (int)x;
  *cols = (int)w;
  jpeg_destroy_decompress(&cinfo); /* the rows below the box are never decoded */
  return 0;
}

/* The image's height and width from its header. 0, or -1 with msg set. */
int mb_jpeg_header(const unsigned char *data, unsigned long size, int *height, int *width,
                   char *msg) {
  return mb_decode(data, size, 1, height, width, 1, 0, 0, 0, 0, NULL, 0, NULL, NULL, msg);
}

/* Decodes rows [top, top + height) of the image at scale 1/denom (denom 1, 2, 4 or 8) as RGB, and
 * at least columns [left, left + width): the decoded columns are [*x0, *x0 + *cols), written
 * row after row (stride *cols * 3 bytes) into out, which holds `capacity` bytes (height *
 * (width + 66) * 3 is always enough: an iMCU is at most 32 pixels wide). 0, or -1 with msg set. */
int mb_jpeg_decode(const unsigned char *data, unsigned long size, int denom, int top, int left,
                   int height, int width, unsigned char *out, unsigned long capacity, int *x0,
                   int *cols, char *msg) {
  int image_height, image_width;
  return mb_decode(data, size, 0, &image_height, &image_width, denom, top, left, height, width,
                   out, capacity, x0, cols, msg);
}
