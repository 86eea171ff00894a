// RequireJS resolves the widget runtime's module ids ("@jupyter-widgets/...") against the page's
// folder, and the runtime finds its icon fonts beside its module's URL. Map the ids to the copy
// served from _static/npm (pktlib.bookassets), found from this script's own URL, so that a page
// at any depth, opened from a server or from disk, loads them from the book itself.
(function () {
  "use strict";
  var me = document.currentScript && document.currentScript.src;
  if (!me || typeof window.require === "undefined" || !window.require.config) return;
  var here = me.slice(0, me.lastIndexOf("/") + 1);
  // The runtime's two bundles take their public path (where the icon fonts are) from the folder of
  // their own module's URL, so those two ids map to files in dist/, beside the fonts.
  var dist = here + "npm/@jupyter-widgets/html-manager/dist/";
  window.require.config({paths: {
    "@jupyter-widgets": here + "npm/@jupyter-widgets",
    "@jupyter-widgets/html-manager": dist + "embed-amd",
    "@jupyter-widgets/html-manager/dist/libembed-amd": dist + "libembed-amd"
  }});
})();
