// The OpenAPI page from files served by medsim itself (no CDN, no inline script, so the
// page's Content-Security-Policy holds). "Authorize" takes a token from `medsim token create`.
"use strict";
window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui", persistAuthorization: false });
